"""Run tracking: one MLflow run per stage invocation (``mlflow_run``), lineage files that travel with outputs
(``lineage``) and pipeline runs compared side by side (``compare``, ``compare_plots``)."""
