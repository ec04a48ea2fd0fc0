"""Datasets (MVTec 3D-AD layout, synthetic parts) and the preprocessing shared by training and the node."""
