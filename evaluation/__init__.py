"""How a model is measured: window scoring (scoring.py), attention inspection
(attention.py), the report table (report.py) and the processes sharing the work
(ranks.py); evaluate.py is the command."""
from store.source import SourceError


class EvalError(SourceError):
    """Bad input from the user; printed as one line."""
