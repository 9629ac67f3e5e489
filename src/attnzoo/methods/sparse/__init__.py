"""D — dynamic, content-dependent sparsity: a selection rule per method, one shared attend kernel (issue 12)."""

from attnzoo.methods.sparse import moba  # noqa: F401
