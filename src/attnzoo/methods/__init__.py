"""Every mechanism, one file each, grouped by family. Importing this package registers them all."""

from attnzoo.methods import linear, local, softmax  # noqa: F401
