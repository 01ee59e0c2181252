"""How a model is measured: window scoring (scoring.py), attention inspection
(attention.py) and the report table (report.py); evaluate.py is the command."""
