from setuptools import find_packages, setup

SERVE = ["fastapi>=0.100", "uvicorn>=0.30", "h11>=0.14", "pydantic>=2.6"]  # python -m minimind.serve

setup(
    name="minimind-triton",
    version="0.1.0",
    description="A performance-focused trainer for MiniMind-class small language models, on hand-written Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kernels", "kernels.*", "minimind", "minimind.*", "train", "train.*",
                                    "bench", "bench.*"]),
    include_package_data=True,
    package_data={"minimind": ["assets/**/*"], "train": ["configs/*.json"]},
    install_requires=[
        "torch>=2.4,<2.14",  # 2.13.0 (the local CPU build) satisfies this; never pulls a newer torch
        "triton>=3.0; platform_system == 'Linux'",
        "tokenizers>=0.15",
        "numpy",
        "tqdm",
    ],
    extras_require={
        # pytest below 9.2: schemathesis 4.32's pytest.from_fixture sets pytest's private Function._nodeid (gone in 9.2)
        "dev": ["pytest>=7,<9.2", "pytest-xdist", "pytest-benchmark", "transformers>=4.40", "safetensors", "jinja2",
                "deepspeed",  # the DeepSpeed test runs on the CPU accelerator
                "liger-kernel",  # its adapters are tested under Triton's interpreter where its kernels allow
                "matplotlib",  # train.plot, and the demo's PNG of its training curves
                *SERVE,
                "openai>=1.0", "schemathesis>=4.0",  # the server's tests: the official client, schema fuzzing
                "playwright>=1.40"],  # the web page in Debian's chromium (.ci/run installs it; no browser download)
        "serve": SERVE,
        "liger": ["liger-kernel"],
        "deepspeed": ["deepspeed"],
        "wandb": ["wandb"],
        "plot": ["matplotlib"],  # python -m train.plot
        "hf": ["transformers>=4.40", "safetensors"],
    },
)
