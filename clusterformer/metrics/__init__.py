"""Metrics: top-k, COCO AP (pycocotools), PQ, mIoU."""
