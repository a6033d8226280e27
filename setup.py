"""Install nnpre: ``pip install -e .`` (add ``[test]`` for the test and benchmark extras)."""
from setuptools import find_packages, setup

setup(
    name="nnpre",
    version="0.1.0",
    description="Large-scale pretraining (MAE, Model Genesis, diffusion) and Retina U-Net detection "
                "as a plugin for nnU-Net v2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nnpre*", "planners*", "nnpre_trainers*", "nnpre_detection*"]),
    package_data={"nnpre_trainers": ["ext/*.py"]},
    install_requires=[
        "nnunetv2>=2.8.1,<2.9",
        # torch 2.9.* is excluded by nnU-Net itself (Conv3d regression); torchvision must import cleanly
        # because timm (via dynamic-network-architectures) and nnU-Net's trainer lookup need it.
        "torch>=2.1.2,!=2.9.*",
        "torchvision",
        "dynamic-network-architectures>=0.4.4,<0.5",
        "batchgenerators>=0.25.1",
        "batchgeneratorsv2>=0.3.2",
        "acvl-utils>=0.2.6,<0.3",
        "SimpleITK>=2.2.1",
        "numpy>=1.24",
        "scipy",
        "blosc2>=3.3.2",
        "tqdm",
        "matplotlib",
        "connected-components-3d",
        "scikit-learn",
    ],
    extras_require={"test": ["pytest", "pytest-xdist", "monai>=1.4", "ruff>=0.6"]},
    entry_points={
        "console_scripts": [
            "nnPre_synth=nnpre.cli.synth:main",
            "nnPre_plan=nnpre.cli.plan:main",
            "nnPre_train=nnpre.cli.train:main",
            "nnPre_predict=nnpre.cli.predict:main",
            "nnPre_evaluate=nnpre.cli.evaluate:main",
            "nnPre_export=nnpre.cli.export:main",
            "nnPre_demo=nnpre.cli.demo:main",
            "nnPre_challenge=nnpre.cli.challenge:main",
        ]
    },
)
