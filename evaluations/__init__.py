"""ADM-exact evaluation (FID, sFID, IS, precision, recall) in PyTorch; see evaluations/evaluator.py.

Kept empty on purpose: importing the evaluator here would make `python -m evaluations.evaluator`
import the module twice (runpy warns about it).
"""
