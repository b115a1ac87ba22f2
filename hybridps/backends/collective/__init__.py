"""The collective backends: every table sharded over all ranks (hybridps.sparse), the dense
parameters allreduced by Horovod (hybridps.dense). BSP runs the exchange on the training
thread (:mod:`bsp`); SSP and ASP on a communication thread (:mod:`pipeline`)."""
