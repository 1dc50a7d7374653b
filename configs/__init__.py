"""Experiment configs (ml_collections), one module per cascade stage plus the cascade.

    from configs import base64, sr256, sr1024, cascade
    config = base64.get_config("paper,batch=256")

Each module's `get_config(arg)` takes big_vision's "VARIANT[,key=value,...]" (see
`configs.common`); on the command line the same module is a config file,
`--config=configs/base64.py:paper,batch=256 --config.train.num_steps=5`.
"""
