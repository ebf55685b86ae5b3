"""The UltraEdit method and nothing else (arXiv 2505.14679; ``ultraedit-method.md``).

* :mod:`.batching`: edit requests and their teacher-forced tokenization, the authors' minibatches;
* :mod:`.capture`: keys and output gradients at the target positions (steps 1-2);
* :mod:`.normalizer`: the lifelong normalizer (step 3);
* :mod:`.solver`: target values and the ridge solve (steps 4-6);
* :mod:`.weights`: module shapes and layouts, where a shift is written (step 7);
* :mod:`.presets`: the authors' edit modules per model family; :mod:`.anatomy`, :mod:`.tail`: where
  a model keeps its layers, and running it from one of them;
* :mod:`.turn`: one faithful turn, in one function.

Nothing here imports the rest of the package.
"""
