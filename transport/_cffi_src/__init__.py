"""C sources of the transport's cffi extension, one module per concern (see _fastlane_build)."""
