"""Shared helpers, one home each.

* :mod:`fxprune.util.modules`: eval mode, devices, forward signatures, calling a model on a batch.
* :mod:`fxprune.util.outputs`: flattening model outputs (tensors, tuples, dicts, HF ModelOutput).
* :mod:`fxprune.util.text`: reading text and records from local files, one meaning everywhere.
* :mod:`fxprune.util.publish`: atomic files and directories.
* :mod:`fxprune.util.names`: parameter-name matching (``ignore=``) and block indices.
* :mod:`fxprune.util.hf`: Hugging Face conventions (Conv1D, labels, ``use_cache``, configs).
"""
