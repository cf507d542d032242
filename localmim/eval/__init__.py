"""Evaluation, on the runtime's precision (:mod:`localmim.runtime.precision`): classification top-1/top-5
(:mod:`.classify`), weighted kNN and the pretraining kNN monitor (:mod:`.knn`), segmentation mIoU / mAcc / aAcc with
slide and whole inference and the prediction grid (:mod:`.segmentation`), COCO box / mask AP via pycocotools and the
prediction picture (:mod:`.detection`), and the per-layer analysis of ``localmim analyze`` (:mod:`.analysis`, its
shard features :mod:`.layer_features`, its figures :mod:`.analysis_plots`). No MLflow, no
stages; figures come back as tensors or PNG bytes for the stage to write."""
