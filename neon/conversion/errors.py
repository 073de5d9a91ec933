class ConversionError(RuntimeError):
    """A checkpoint, directory or tokenizer the converters cannot use; the message names it and the fix."""
