import lorweb_testing  # noqa: F401  (puts the repository root on sys.path)
