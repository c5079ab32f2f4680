"""fxprune passes, one module per step: capture -> analysis -> scoring -> plan -> rewrite ->
recovery -> export.  Each is a plain function over the shared ``PrunableGraph`` or plain data."""
