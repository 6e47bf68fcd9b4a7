"""sandboxd: run tests and untrusted code in throwaway, resource-limited containers."""

import logging

# A library stays silent unless the application configures logging (the CLI does).
logging.getLogger(__name__).addHandler(logging.NullHandler())
