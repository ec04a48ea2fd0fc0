"""The MAFR model without ROS: frozen extractors, grid alignment, fusion-restoration heads, losses,
scoring and the Detector that maps (rgb, xyz) arrays to anomaly scores and maps."""
