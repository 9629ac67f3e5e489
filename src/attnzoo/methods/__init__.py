"""Every mechanism, one file each, grouped by family. Importing this package registers them all."""

import attnzoo.methods.linear  # noqa: F401
from attnzoo.methods import softmax  # noqa: F401
