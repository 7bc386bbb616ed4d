from setuptools import Extension, find_packages, setup

with open("README.md", encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="stargate",
    version="2.0.0.dev0",
    description=(
        "WebSocket support and a pub/sub broadcast hub for Pyramid, on eventlet"
    ),
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="BSD",
    packages=find_packages(include=["stargate", "stargate.*"]),
    include_package_data=True,
    # Optional: without a C compiler, stargate runs on its pure Python path.
    ext_modules=[
        Extension("stargate._speedups", ["stargate/_speedups.c"], optional=True)
    ],
    package_data={"stargate": ["demo/*.html", "demo/*.ini"]},
    python_requires=">=3.10",
    install_requires=[
        "pyramid>=2.0",
        "eventlet>=0.36",
        "webob>=1.8",
        "redis>=5.0",
        "PasteDeploy>=3.0",
    ],
    extras_require={
        "hiredis": ["hiredis"],
        "test": [
            "pytest>=8",
            "pytest-timeout",
            "hypothesis>=6",
            "websockets>=13",
            "playwright",
            "psutil",
            "WebTest",
        ],
        "bench": ["websockets>=13", "matplotlib", "psutil"],
        "docs": ["sphinx>=7"],
        "dev": ["ruff"],
    },
    entry_points={
        "paste.server_factory": ["main = stargate.factory:server_factory"],
        "console_scripts": ["stargate = stargate.__main__:main"],
        "paste.app_factory": ["demo = stargate.demo:main"],
        "pytest11": ["stargate = stargate.testing.pytest_plugin"],
    },
    classifiers=[
        "Framework :: Pyramid",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Topic :: Internet :: WWW/HTTP :: WSGI :: Server",
    ],
)
