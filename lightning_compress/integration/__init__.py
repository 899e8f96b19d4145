"""Where lightning_compress meets a Lightning ``Trainer``: evaluation on the validation data, supported
strategies, and (``_compat``) every private Lightning / torch attribute the package relies on."""
