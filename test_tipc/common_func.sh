#!/bin/bash
# Parsing helpers and the status line of the KDAD TIPC chain (sourced by the test_tipc/*.sh scripts).
#
# Semantics follow the PaddleOCR/PaddleClas test_tipc helpers (see test_tipc/README.md):
#   func_parser_key   "key:value"            -> key
#   func_parser_value "key:value"            -> value (text after a second ':' is dropped, as upstream)
#   func_parser_params "key:m1=a|m2=b" MODE  -> the entry of MODE ("" if there is none)
#   func_set_params KEY VALUE                -> "KEY=VALUE", or " " when KEY or VALUE is null/empty
#   status_check STATUS CMD LOG MODEL [RUN_LOG] -> one "Run successfully/failed with command - ..." line
# Project extensions:
#   func_parser_value_mode LINE MODE         -> like func_parser_value, but a value written as a
#                                               per-mode list "m1=a|m2=b" resolves to MODE's entry
#   status_skip REASON CMD LOG MODEL [RUN_LOG] -> one "Run skipped (REASON) with command - ..." line
#                                               (neither a success nor a failure)

# The TIPC modes known to the per-mode syntax.
TIPC_MODES="lite_train_lite_infer lite_train_whole_infer whole_infer whole_train_whole_infer paddle2onnx_infer"

function func_parser_key() {
    local strs=$1
    local IFS=":"
    local array=(${strs})
    echo "${array[0]}"
}

function func_parser_value() {
    local strs=$1
    local IFS=":"
    local array=(${strs})
    echo "${array[1]}"
}

function func_parser_params() {
    # $1: a "key:m1=v1|m2=v2" line; $2: the mode (defaults to the global MODE).
    local strs=$1
    local mode=${2:-${MODE}}
    local value
    value=$(func_parser_value "${strs}")
    local IFS="|"
    local item
    for item in ${value}; do
        if [ "${item%%=*}" = "${mode}" ]; then
            echo "${item#*=}"
            return 0
        fi
    done
    echo ""
}

function func_is_mode_list() {
    # True when the value is a per-mode list: its first '|' item starts with "<known mode>=".
    local first=${1%%|*}
    local name=${first%%=*}
    [ "${name}" != "${first}" ] || return 1
    local m
    for m in ${TIPC_MODES}; do
        [ "${name}" = "${m}" ] && return 0
    done
    return 1
}

function func_parser_value_mode() {
    # $1: line; $2: mode. Plain values are returned unchanged; "m1=a|m2=b" gives the entry of mode.
    local value
    value=$(func_parser_value "$1")
    if func_is_mode_list "${value}"; then
        func_parser_params "$1" "${2:-${MODE}}"
    else
        echo "${value}"
    fi
}

function func_set_params() {
    local key=$1
    local value=$2
    if [ "${key}" = "null" ] || [ -z "${key}" ]; then
        echo " "
    elif [ "${value}" = "null" ] || [ -z "${value// /}" ]; then
        echo " "
    else
        echo "${key}=${value}"
    fi
}

function status_check() {
    # $1: exit status; $2: command; $3: status log; $4: model name; $5: log of the run (optional).
    local last_status=$1
    local run_command=$2
    local run_log=$3
    local model_name=$4
    local log_path=${5:-}
    if [ "${last_status}" -eq 0 ]; then
        echo -e "\033[33m Run successfully with command - ${model_name} - ${run_command} - ${log_path} \033[0m" | tee -a "${run_log}"
    else
        echo -e "\033[33m Run failed with command - ${model_name} - ${run_command} - ${log_path} \033[0m" | tee -a "${run_log}"
    fi
}

function status_skip() {
    # $1: reason; $2: command that was not run; $3: status log; $4: model name; $5: log path.
    echo -e "\033[33m Run skipped (${1}) with command - ${4} - ${2} - ${5:-} \033[0m" | tee -a "${3}"
}

function tipc_has_gpu() {
    # 0 when this paddle is a CUDA build and sees at least one device.
    "${1:-python}" -c "import sys, paddle; sys.exit(0 if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0 else 1)" >/dev/null 2>&1
}

function tipc_has_tensorrt() {
    "${1:-python}" -c "import sys, paddle; sys.exit(0 if paddle.inference.get_trt_compile_version() != (0, 0, 0) else 1)" >/dev/null 2>&1
}

function tipc_summary() {
    # $1: status log. Prints counts; returns 1 when any "Run failed" line (or no success) is present.
    local log=$1
    local ok failed skipped
    ok=$(grep -c "Run successfully with command" "${log}" 2>/dev/null)
    failed=$(grep -c "Run failed with command" "${log}" 2>/dev/null)
    skipped=$(grep -c "Run skipped" "${log}" 2>/dev/null)
    echo "TIPC summary (${log}): ${ok:-0} succeeded, ${failed:-0} failed, ${skipped:-0} skipped"
    if [ "${failed:-0}" -gt 0 ]; then
        grep "Run failed with command" "${log}"
        return 1
    fi
    if [ "${ok:-0}" -eq 0 ]; then
        echo "TIPC: no step ran successfully"
        return 1
    fi
    return 0
}

# Reads the first $2 lines of params file $1 into the global array `lines` (blank lines are
# skipped by the split); exits 2 when fewer than $2 are there. $2 = 0 reads the whole file.
function func_read_params() {
    local file=$1 count=$2 dataline
    if [ "${count}" -gt 0 ]; then
        dataline=$(awk -v n="${count}" 'NR<=n{print}' "${file}")
    else
        dataline=$(cat "${file}")
    fi
    IFS=$'\n'
    lines=(${dataline})
    unset IFS
    if [ "${count}" -gt 0 ] && [ ${#lines[@]} -lt "${count}" ]; then
        echo "error: ${file} has ${#lines[@]} non-blank lines among its first ${count}; ${count} are read (no blank lines)" >&2
        exit 2
    fi
}
