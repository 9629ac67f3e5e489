"""Every mechanism, one file each, grouped by family. Importing this package registers them all."""

from attnzoo.methods import linear, softmax, structured  # noqa: F401
