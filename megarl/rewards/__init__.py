"""Rewards: math answer grading (extraction, equivalence, an isolated worker pool), code execution.

Import-light on purpose: sympy and the LaTeX parser load only when a grading actually needs
them (in the grader's worker processes), so the trainer process never pays for them.

    megarl.rewards.math     extract_answer, is_equiv, grade, GradeResult   (in-process, no isolation)
    megarl.rewards.grader   GraderConfig, GraderPool                       (worker processes, hard limits)
"""
