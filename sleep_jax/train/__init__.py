"""The one trainer: train state and trainable masks (``state``), the optimizer factory with the CMS
update frequencies (``optimizer``), the jitted step and its memo (``step``), the loop every phase,
baseline, the base-model recipe and the LM job run (``fit``), and the LM job itself (``lm_job``)."""
