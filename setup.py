"""Build of hybridps: the Python package plus the Cython kernels from cython/.

Each ``cython/NAME.pyx`` becomes the extension module ``hybridps._NAME``. Pinned dependency
versions live in requirements.txt (read by `make setup`); install_requires below only states
what the package needs at all, so a cluster's own TensorFlow/Horovod builds are not replaced.
"""
import glob
import os

from setuptools import Extension, find_packages, setup

try:
    from Cython.Build import cythonize
except ImportError as exc:  # pragma: no cover - build-time message
    raise SystemExit("building hybridps needs Cython 3: pip install 'Cython>=3' "
                     "(or run `make setup`)") from exc

HERE = os.path.dirname(os.path.abspath(__file__))
PXD = glob.glob(os.path.join("cython", "*.pxd"))
extensions = [
    Extension(
        f"hybridps._{os.path.splitext(os.path.basename(pyx))[0]}",
        [pyx],
        depends=PXD,
        extra_compile_args=["-O3", "-fno-strict-aliasing", "-fno-math-errno"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    for pyx in sorted(glob.glob(os.path.join("cython", "*.pyx")))
]

setup(
    name="hybridps",
    version="0.1.0",
    description="Sparse CTR model training on MPI clusters without a parameter server",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(
        os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["hybridps", "hybridps.*"]),
    package_data={"hybridps": ["data/samples/*"]},
    ext_modules=cythonize(extensions, compiler_directives={"language_level": 3},
                          include_path=["cython"]),
    install_requires=["numpy", "PyYAML"],
    extras_require={"train": ["tensorflow", "mpi4py>=4", "horovod"],
                    "test": ["pytest", "hypothesis", "pandas"]},
    entry_points={"console_scripts": ["hybridps=hybridps.cli:main"]},
    zip_safe=False,
)
