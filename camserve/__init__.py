"""camserve from Python and from the shell: ``from camserve import Client``; the ``camserve``
command (``camserve.cli``)."""

from camserve.answers import Explained, MethodMaps
from camserve.client import AsyncClient, AsyncJob, Client, Job, RetryPolicy
from camserve.errors import ClientError, ServiceError, Unreachable
from camserve.request import ExplainRequest

__all__ = [
    "AsyncClient",
    "AsyncJob",
    "Client",
    "ClientError",
    "ExplainRequest",
    "Explained",
    "Job",
    "MethodMaps",
    "RetryPolicy",
    "ServiceError",
    "Unreachable",
]
