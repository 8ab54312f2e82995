"""ImageIdTokenizer and the identifier builders."""
from .identifier_table import IdentifierTable, IdentifierTableError
