"""The real-LM study's text extraction (benchmarks/real_lm_corpus.py): prose kept, markup and
code dropped, a fixed file split with no shared paragraph, whole-paragraph chunks."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import real_lm_corpus as rc  # noqa: E402

DOC = """\
.. _tut-if:

:keyword:`!if` Statements
=========================

Perhaps the most well-known statement type is the :keyword:`if` statement.  For
example::

   >>> x = int(input("Please enter an integer: "))
   >>> if x < 0:
   ...     x = 0

There can be zero or more :keyword:`elif` parts, see :ref:`the loop <tut-for>` and
``case`` statements of `other languages <https://example.org>`_ in *some* **detail**.

.. note::
   A note body that is indented and dropped with its directive.

Short title line

+------+------+
| a    | b    |
+------+------+
"""


def test_prose_kept_markup_and_code_dropped():
    got = rc.rst_paragraphs(DOC)
    assert got == [
        "Perhaps the most well-known statement type is the if statement. For example:",
        "There can be zero or more elif parts, see the loop and case statements of other "
        "languages in some detail.",
    ]


def test_clean_inline_forms():
    assert rc.clean_inline(":func:`len` and :meth:`!str.join`") == "len and str.join"
    assert rc.clean_inline("``x = 1``  is  *fine*::") == "x = 1 is fine:"


def test_split_is_fixed_and_disjoint():
    paths = [f"tutorial/f{i}.rst.txt" for i in range(400)]
    evals = [p for p in paths if rc.is_eval_file(p)]
    assert evals == [p for p in paths if rc.is_eval_file(p)]  # deterministic
    assert 0.15 < len(evals) / len(paths) < 0.35  # about a quarter


def test_chunks_are_whole_paragraphs_in_order():
    paras = [f"p{i} " + "w" * (i * 37 % 300) for i in range(50)]
    chunks = rc.chunk_paragraphs(paras, 500)
    assert "\n".join(chunks).split("\n") == paras
    assert all(len(c) >= 499 for c in chunks[:-1])
    assert all(len(c) - len(c.rsplit("\n", 1)[-1]) < 500 for c in chunks)  # ends at the first paragraph that reaches it
