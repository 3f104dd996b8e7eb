#!/usr/bin/env python3
"""Writes docs/api/openapi.json, the API's contract. Edit here, run, commit
both; the conformance test checks the served routes against the JSON."""
import json, os

def ref(n): return {"$ref": f"#/components/schemas/{n}"}
def jbody(schema, required=True):
    return {"required": required, "content": {"application/json": {"schema": schema}}}
def resp(desc, schema=None, ctype="application/json"):
    r = {"description": desc}
    if schema is not None:
        r["content"] = {ctype: {"schema": schema}}
    return r
ERR = lambda d: resp(d, ref("Error"))
NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[a-z0-9_-]{1,32}$"}}
KEY = {"name": "Idempotency-Key", "in": "header", "required": False,
       "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
       "description": "A retry with the same key returns the operation the first request started."}
COMMON = {"400": ERR("bad input"), "503": ERR("the config store is unreachable, or the API is overloaded")}

def op_started():
    return {"202": resp("operation started (or the running one this key started)", ref("Operation")),
            "200": resp("the finished operation this key started", ref("Operation")),
            "409": ERR("another operation holds the VM, or the VM is in the wrong state"),
            "422": ERR("the Idempotency-Key was used for another request"), **COMMON}

def action(summary, body=None, extra=None):
    o = {"summary": summary, "parameters": [NAME],
         "responses": {"200": resp("done", ref("ActionResult")), "404": ERR("no such VM"),
                       "409": ERR("the VM is not running, or an operation holds it"),
                       "502": ERR("the VMM did not answer"), **COMMON}}
    o["requestBody"] = jbody(body or ref("Empty"), required=False)
    return o

paths = {
  "/openapi.json": {"get": {"summary": "This document", "responses": {"200": resp("the OpenAPI document", {"type": "object"})}}},
  "/v1/ping": {"get": {"summary": "The API process answers", "responses": {"200": resp("alive", ref("Ping"))}}},
  "/v1/vms": {
    "get": {"summary": "Every defined VM with its desired and actual state",
            "responses": {"200": resp("the VMs", ref("VmList")), "503": COMMON["503"]}},
    "post": {"summary": "Create a VM from a definition (journaled: define, wait-running; rolled back if it does not start)",
             "parameters": [KEY], "requestBody": jbody(ref("CreateVm")), "responses": op_started()}},
  "/v1/vms/{name}": {
    "get": {"summary": "One VM", "parameters": [NAME],
            "responses": {"200": resp("the VM", ref("Vm")), "404": ERR("no such VM"), "503": COMMON["503"]}},
    "delete": {"summary": "Delete a VM (journaled: stop, wait-stopped, undefine, wait-gone, cleanup)",
               "parameters": [NAME, KEY], "responses": {**op_started(), "404": ERR("no such VM")}}},
  "/v1/vms/{name}/disks": {"get": {"summary": "The VM's disks", "parameters": [NAME],
            "responses": {"200": resp("disks", ref("Disks")), "404": ERR("no such VM"), "409": ERR("bad definition"), "503": COMMON["503"]}}},
  "/v1/vms/{name}/nics": {"get": {"summary": "The VM's NICs", "parameters": [NAME],
            "responses": {"200": resp("NICs", ref("Nics")), "404": ERR("no such VM"), "409": ERR("bad definition"), "503": COMMON["503"]}}},
  "/v1/vms/{name}/start": {"post": action("Desired state: running (the supervisor starts it)")},
  "/v1/vms/{name}/stop": {"post": action("Desired state: stopped (the supervisor stops it)")},
  "/v1/vms/{name}/pause": {"post": action("Pause the guest's vCPUs")},
  "/v1/vms/{name}/resume": {"post": action("Resume the guest's vCPUs")},
  "/v1/vms/{name}/reboot": {"post": action("Cold reboot: the guest boots again from its kernel")},
  "/v1/vms/{name}/upgrade": {"post": action("Warm upgrade: a successor VMM (optionally another binary) takes the guest over in memory", ref("Binary"))},
  "/v1/vms/{name}/snapshot": {"post": {"summary": "Save the VM to a file in its snapshot directory, then stop it (journaled: save, wait-stopped)",
            "parameters": [NAME, KEY], "requestBody": jbody(ref("SnapshotRequest")), "responses": {**op_started(), "404": ERR("no such VM")}}},
  "/v1/vms/{name}/restore": {"post": {"summary": "Start a stopped VM from one of its snapshots (journaled: define, wait-running, clear; rolled back on failure)",
            "parameters": [NAME, KEY], "requestBody": jbody(ref("SnapshotRequest")), "responses": {**op_started(), "404": ERR("no such VM")}}},
  "/v1/host/components": {"get": {"summary": "Every component the supervisor runs, with health and restarts",
            "responses": {"200": resp("components", ref("Components"))}}},
  "/v1/host/upgrade": {
    "get": {"summary": "The rolling upgrade asked for and each component's generation",
            "responses": {"200": resp("state", ref("HostUpgradeState")), "503": COMMON["503"]}},
    "post": {"summary": "Rolling upgrade of every component to a binary (journaled: request, wait)",
             "parameters": [KEY], "requestBody": jbody(ref("HostUpgradeRequest")), "responses": op_started()}},
  "/v1/operations": {"get": {"summary": "Every journaled operation", "responses": {"200": resp("operations", ref("OperationList")), "503": COMMON["503"]}}},
  "/v1/operations/{id}": {"get": {"summary": "One operation", "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": resp("the operation", ref("Operation")), "404": ERR("no such operation"), "503": COMMON["503"]}}},
  "/v1/events": {"get": {"summary": "The host's events as Server-Sent Events; each id is a cursor to resume from",
            "parameters": [{"name": "cursor", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0}},
                           {"name": "follow", "in": "query", "required": False, "schema": {"type": "boolean"}}],
            "responses": {"200": resp("the event stream", {"type": "string"}, "text/event-stream"), "400": ERR("bad cursor")}}},
  "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": resp("text format 0.0.4", {"type": "string"}, "text/plain"), "503": COMMON["503"]}}},
}

nullable_str = {"type": ["string", "null"]}
schemas = {
  "Error": {"type": "object", "required": ["code", "message"], "additionalProperties": False,
            "properties": {"code": {"type": "string", "enum": ["bad-request", "invalid-definition", "not-found", "conflict", "busy",
                    "wrong-state", "store-unavailable", "vmm-error", "internal", "too-large", "method-not-allowed", "unauthorized",
                    "rate-limited", "overloaded", "idempotency-key-reused"]}, "message": {"type": "string"}}},
  "Empty": {"type": "object", "additionalProperties": False},
  "Ping": {"type": "object", "required": ["pid", "version"], "properties": {"pid": {"type": "integer"}, "version": {"type": "string"}, "run_dir": {"type": "string"}}},
  "Disk": {"type": "object", "required": ["path"], "additionalProperties": False,
           "properties": {"path": {"type": "string", "minLength": 1}, "readonly": {"type": "boolean"}}},
  "Nic": {"type": "object", "required": ["tap"], "additionalProperties": False,
          "properties": {"tap": {"type": "string", "minLength": 1, "maxLength": 15}, "mac": nullable_str, "netns": nullable_str}},
  "Definition": {"type": "object", "required": ["kernel"], "additionalProperties": False,
     "properties": {"kernel": {"type": "string", "minLength": 1}, "cmdline": {"type": "string"},
                    "memory": {"type": "integer", "minimum": 16, "description": "MiB"}, "vcpus": {"type": "integer", "minimum": 1, "maximum": 64},
                    "disk": {"type": "array", "items": ref("Disk")}, "nic": {"type": "array", "items": ref("Nic")},
                    "on_poweroff": {"type": "string", "enum": ["stop", "restart"]}, "state": {"type": "string", "enum": ["running", "stopped"]},
                    "restore": {"type": "string", "description": "set by the restore operation only"}}},
  "CreateVm": {"type": "object", "required": ["name", "definition"], "additionalProperties": False,
     "properties": {"name": {"type": "string", "pattern": "^[a-z0-9_-]{1,32}$"}, "definition": ref("Definition"),
                    "timeout_s": {"type": ["integer", "null"], "minimum": 0}}},
  "Vm": {"type": "object", "required": ["name", "desired", "state", "components"],
     "properties": {"name": {"type": "string"}, "desired": {"type": "string"},
                    "state": {"type": "string", "description": "running, starting, recovering, stopped, error, running-with-error, backoff, unknown"},
                    "error": nullable_str, "definition": {"oneOf": [ref("Definition"), {"type": "null"}]},
                    "components": {"type": "array", "items": {"type": "object"}}, "operation": nullable_str}},
  "VmList": {"type": "object", "required": ["vms"], "properties": {"vms": {"type": "array", "items": ref("Vm")}}},
  "Disks": {"type": "object", "required": ["disks"], "properties": {"disks": {"type": "array", "items": {"type": "object",
            "required": ["index", "path", "readonly"], "properties": {"index": {"type": "integer"}, "path": {"type": "string"}, "readonly": {"type": "boolean"}}}}}},
  "Nics": {"type": "object", "required": ["nics"], "properties": {"nics": {"type": "array", "items": {"type": "object",
            "required": ["index", "tap"], "properties": {"index": {"type": "integer"}, "tap": {"type": "string"}, "mac": nullable_str, "netns": nullable_str}}}}},
  "ActionResult": {"type": "object", "required": ["vm", "action"], "properties": {"vm": {"type": "string"}, "action": {"type": "string"}, "vmm": {}}},
  "Binary": {"type": "object", "additionalProperties": False, "properties": {"binary": {"type": ["string", "null"], "description": "absolute path"}}},
  "SnapshotRequest": {"type": "object", "required": ["path"], "additionalProperties": False,
     "properties": {"path": {"type": "string", "description": "a file name in <run_dir>/snapshots/<vm>/, or that absolute path"}}},
  "HostUpgradeRequest": {"type": "object", "required": ["binary"], "additionalProperties": False, "properties": {"binary": {"type": "string"}}},
  "HostUpgradeState": {"type": "object", "required": ["components", "upgraded"],
     "properties": {"binary": nullable_str, "generation": {"type": ["integer", "null"]}, "upgraded": {"type": "integer"},
                    "components": {"type": "array", "items": {"type": "object"}}}},
  "Components": {"type": "object", "required": ["components"], "properties": {"supervisor": {}, "status_age_ms": {"type": ["integer", "null"]},
                    "components": {"type": "array", "items": {"type": "object"}}}},
  "Mark": {"type": "object", "required": ["phase", "at_ms"], "properties": {"phase": {"type": "string"}, "at_ms": {"type": "integer"}}},
  "Operation": {"type": "object", "required": ["id", "kind", "phase", "status", "created_ms", "updated_ms", "history"],
     "properties": {"id": {"type": "string"}, "kind": {"type": "string", "enum": ["create", "delete", "snapshot", "restore", "host-upgrade"]},
                    "vm": nullable_str, "key": nullable_str, "params": {}, "phase": {"type": "string"},
                    "status": {"type": "string", "enum": ["running", "succeeded", "failed", "rolled-back"]},
                    "error": nullable_str, "result": {}, "created_ms": {"type": "integer"}, "updated_ms": {"type": "integer"},
                    "history": {"type": "array", "items": ref("Mark")}}},
  "OperationList": {"type": "object", "required": ["operations"], "properties": {"operations": {"type": "array", "items": ref("Operation")}}},
}
doc = {"openapi": "3.1.0",
       "info": {"title": "Staunch API", "version": "0.1.0",
                "description": "The toolstack of a Staunch host: HTTP/1.1 on a unix socket (staunch api). Multi-step operations are journaled in the config store and survive a crash of the API. Errors are JSON with a stable code."},
       "paths": paths, "components": {"schemas": schemas}}
out = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "api", "openapi.json")
with open(out, "w") as f:
    json.dump(doc, f, indent=1)
    f.write("\n")
