"""``memseg-edge plc-gateway``: the runtime's ZeroMQ verdicts served to PLCs over OPC UA and Modbus TCP.

``state`` holds the rules (handshake, backlog, fail-safe), ``opcua`` and ``modbus`` render them,
``service`` runs the process. Nothing here is imported by the runtime: the gateway only subscribes.
"""
