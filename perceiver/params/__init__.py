"""Parameter files and conversions: this project's ``.npz`` and DeepMind's pickle
(``params_file``), Hugging Face names and files (``hf``, ``hf_io``), a file's kind told by
its content (``formats``), the one reader (``loading.load_any``), and a classifier's
parameters from a pretrained masked LM (``transfer``). Nothing here imports the training
library."""
