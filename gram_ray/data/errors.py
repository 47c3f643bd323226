class DecodeError(Exception):
    """One clip that cannot be used; str(error) is the reason recorded in report.json."""
