"""hfsoftmax: training classifiers over millions of classes (HF-softmax, parameter server, baselines)."""
from setuptools import find_packages, setup

setup(
    name="hfsoftmax",
    version="0.1.0",
    description="HF-softmax: accelerated training for massive classification via dynamic class selection",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["hfsoftmax", "hfsoftmax.*", "paramserver", "paramserver.*"]),
    # torch itself is installed first, pinned, by requirements.txt (see README):
    # listing it here with a range would let pip pull a CUDA build on a fresh machine.
    install_requires=["numpy>=1.24", "pyzmq>=25", "annoy>=1.17", "faiss-cpu>=1.7", "hnswlib>=0.7",
                      "pyyaml>=6", "tqdm>=4.60", "pillow>=9"],
    extras_require={"export": ["onnx>=1.15", "onnxruntime>=1.17"],     # tools/export_onnx.py
                    "tensorboard": ["tensorboard>=2.10"]},               # train.tensorboard=true
    license="MIT",
)
