"""Raw datasets as users have them on disk: the manifests the DAG tracks instead of the files (:mod:`.datasets`),
ImageNet's layouts (:mod:`.imagenet_val`), ImageFolder listing and one-image verification (:mod:`.imagefolder`), and
the one check / reader of image files read directly (:mod:`.imagefile`)."""
