"""The local demo of airflow-flux: ``make demo`` (``python -m demo.run_demo``) and ``make demo-ui``.

Everything runs on 127.0.0.1 from the project's virtualenv: the fal queue emulator and a
moto S3 server as child processes, Airflow on a throw-away ``AIRFLOW_HOME``, connections
as environment variables of those processes only.
"""
