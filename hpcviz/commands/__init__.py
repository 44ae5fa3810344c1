"""The commands behind jobs/*.py: each module has `get_args_parser(add_help=False)`, derived from the config
dataclasses so that launchers compose them, and a `main(args)` that checks the whole request before it
touches the run directory, takes the run's lock for the commands that change it, and turns every hpcviz
error into one `error:` line and its exit code (hpcviz.cli.command).

  train      jobs/launch_train.py       viz        jobs/launch_viz.py
  pipeline   jobs/launch_pipeline.py    aggregate  jobs/aggregate.py
  evaluate   jobs/evaluate.py           inspect    jobs/inspect_results.py
  pack       jobs/pack_data.py          benchmark  jobs/benchmark.py
  importing  jobs/import_model.py
"""
