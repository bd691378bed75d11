"""The fatal errors of conversion. Kept free of heavy imports: the CLI reports them without loading FFCV/torch."""


class SourceError(Exception):
    """The source tree, class list or output location cannot be used at all."""


class ConversionError(Exception):
    """The write cannot finish (strict mode hit a bad file, disk full, a worker died); nothing is kept."""
