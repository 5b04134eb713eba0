"""Build script: the relay package and its Cython hot path (relay/_fast).

Each ``relay/_fast/*.pyx`` is its own Extension.  Options follow uvloop's
build_ext: ``--cython-always``, ``--cython-annotate`` and
``--cython-directives``.  ``RELAY_DEBUG=1`` turns on line tracing and
annotation; ``RELAY_NO_EXTENSIONS=1`` builds no extension at all (the pure
Python twins in relay/_ref are used then).
"""

import glob
import os

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext as _build_ext

NO_EXTENSIONS = os.environ.get("RELAY_NO_EXTENSIONS") == "1"
DEBUG = os.environ.get("RELAY_DEBUG") == "1"


class build_ext(_build_ext):
    user_options = _build_ext.user_options + [
        ("cython-always", None, "run cythonize() even if .c files are present"),
        ("cython-annotate", None, "produce a colorized HTML version of the source"),
        ("cython-directives=", None, "Cython compiler directives"),
    ]
    boolean_options = _build_ext.boolean_options + ["cython-always", "cython-annotate"]

    def initialize_options(self):
        super().initialize_options()
        self.cython_always = False
        self.cython_annotate = DEBUG
        self.cython_directives = None

    def finalize_options(self):
        from Cython.Build import cythonize

        directives = {"language_level": "3", "boundscheck": False, "wraparound": False}
        if DEBUG:
            directives.update(linetrace=True, boundscheck=True, wraparound=True)
        if self.cython_directives:
            for item in self.cython_directives.split(","):
                key, _, value = item.partition("=")
                directives[key.strip()] = value.strip()
        self.distribution.ext_modules[:] = cythonize(
            self.distribution.ext_modules,
            compiler_directives=directives,
            annotate=self.cython_annotate,
            force=self.cython_always,
        )
        super().finalize_options()


def fast_extensions():
    if NO_EXTENSIONS:
        return []
    from setuptools import Extension

    macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []
    extensions = []
    for pyx in sorted(glob.glob("relay/_fast/*.pyx")):
        name = pyx[: -len(".pyx")].replace("/", ".")
        extensions.append(
            Extension(name, [pyx], define_macros=macros, extra_compile_args=["-O2"])
        )
    return extensions


setup(
    name="relay",
    version="0.1.0",
    description="Outbound SMTP relay (smarthost) for applications that send a lot of mail",
    python_requires=">=3.11",
    packages=find_packages(include=["relay", "relay.*"]),
    package_data={"relay._fast": ["*.pyi", "*.pxd", "*.pyx"]},
    install_requires=[
        "uvloop>=0.19",
        # The intake subclasses aiosmtpd's SMTP and relies on private names
        # (tests/unit/intake/test_aiosmtpd_contract.py lists them): only the
        # tested release line, never a new minor unseen.
        "aiosmtpd>=1.4.6,<1.5",
        "dnspython>=2.6.1",
        "cryptography>=42",
        "orjson>=3.9",
        "idna>=3.7",
        "tomli-w>=1.0",
        "aiohttp>=3.9",
        "jinja2>=3.1",
        "aio-pika>=10.2,<11",
        "httpx>=0.28,<1",
    ],
    extras_require={
        # aiosmtplib and dkimpy are used by the tests and perf/ only: the
        # relay runs without them (tests/unit/test_dependencies.py).
        "test": [
            "pytest>=8",
            "hypothesis>=6",
            "pynacl>=1.5",
            "prometheus_client>=0.20",
            "ruff>=0.5",
            "aiosmtplib>=5.1.2",
            "dkimpy>=1.1",
        ],
        # The long fuzz run (scripts/fuzz); a binary wheel, no clang needed.
        "fuzz": ["atheris>=2.3"],
    },
    ext_modules=fast_extensions(),
    cmdclass={"build_ext": build_ext},
    entry_points={
        "console_scripts": [
            "relay=relay.supervisor:main",
            "relayctl=relay.cli:main",
            "relay-sendmail=relay.cli.sendmail:main",
        ]
    },
)
