try:
    import pypyjit
except ImportError:
    pass
else:
    pypyjit.set_param("trace_limit=24000")
