"""The training library every task shares: one run driver (``driver``), one loop
(``loop``), the steps jitted over a device mesh (``step``, ``mesh``), optimizers
(``optim``), losses as sums (``losses``), checkpoints of a run (``run_checkpoints``), logs
(``writer``), feeding the devices (``feed``), hosts and stops (``hosts``), and the
host-memory policy of XLA:CPU processes (``host_memory``)."""
