"""Study Query LLM: call many language-model providers, record every call, compare the results."""

__version__ = "0.1.0"
