"""The ground floor: config tree, stage store, stage runner, document schema, parallel map."""
import logging

# Stage progress is logged at INFO on "lmfoundry.*"; Prefect forwards these loggers into run
# logs (PREFECT_LOGGING_EXTRA_LOGGERS) but leaves their level at the root's WARNING.
logging.getLogger("lmfoundry").setLevel(logging.INFO)
