"""The dense-task datasets in their release layouts: ADE20K semantic segmentation (:mod:`.ade20k`) and COCO
detection / instance segmentation (:mod:`.coco`)."""
