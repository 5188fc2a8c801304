"""`align eval`: evaluation suites that compare models (base, SFT, DPO, merged) side by side.

Import with the package prefix (`from eval.run import run_eval`); a bare `import eval` shadows the builtin.
"""
