"""The native API: ``/innova/api/smollm/*`` and ``/innova/api/chatlaya/message``."""
