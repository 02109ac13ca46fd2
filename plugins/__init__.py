"""Built-in metarec plugins. They use only the public API of ``metarec``, like third-party ones."""
