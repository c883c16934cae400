"""Installation for hvd_ngd: ``pip install -e .[torch]`` or ``.[tensorflow]`` or ``.[all]``."""

from setuptools import find_packages, setup

setup(
    name="hvd_ngd",
    version="0.1.0",
    description="Horovod-based distributed natural-gradient (K-FAC / SP-NGD) preconditioner",
    packages=find_packages(include=["hvd_ngd", "hvd_ngd.*"]),
    python_requires=">=3.9",
    install_requires=["numpy>=1.22,<2"],
    extras_require={
        "torch": ["torch==2.13.0", "horovod==0.28.1"],
        "tensorflow": ["tensorflow-cpu==2.17.*", "tf-keras==2.17.*", "horovod==0.28.1"],
        "all": ["torch==2.13.0", "tensorflow-cpu==2.17.*", "tf-keras==2.17.*", "horovod==0.28.1"],
        "examples": ["scikit-learn", "tqdm", "matplotlib"],
        "test": ["pytest", "pytest-timeout", "hypothesis", "scikit-learn"],
    },
)
