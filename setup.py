"""pip install of the mafr_ros Python package (the `mafr` command).

The ROS 2 build (colcon) uses CMakeLists.txt instead; both install the same package.
"""
from setuptools import find_packages, setup

setup(
    name="mafr_ros",
    version="0.1.0",
    description="Multi-modal (RGB + 3D) industrial anomaly detection (MAFR) as a ROS 2 node",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["mafr_ros", "mafr_ros.*"]),
    entry_points={"console_scripts": ["mafr = mafr_ros.cli:main"]},
)
