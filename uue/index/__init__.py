"""Statement indexes: the batch build on Ray Data (uue.index.build) and reading a built one (uue.index.load),
which is all serving imports."""

from uue.index.load import IncompleteIndexError, StatementIndex, UnknownStatementError

__all__ = ["IncompleteIndexError", "StatementIndex", "UnknownStatementError"]
