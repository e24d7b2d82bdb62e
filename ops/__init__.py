"""Operations: the audit log, processes, the environment, secret files.

Everything here touches the machine (files, processes, environment variables);
``wardround.common`` stays the pure core it builds on.
"""
