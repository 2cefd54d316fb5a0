#!/bin/bash
# Parsing helpers and the status line of the KDAD TIPC chain (sourced by the test_tipc/*.sh drivers).
#
# The first five keep the semantics of the standard TIPC helpers of the Paddle repositories
# (PaddleOCR/PaddleClas test_tipc/common_func.sh), so a params file parses the same way here and
# under the standard driver:
#   func_parser_key   "key:value"            -> key
#   func_parser_value "key:value"            -> value (text after a second ':' is dropped)
#   func_parser_params "key:m1=a|m2=b" MODE  -> the entry of MODE ("" if there is none)
#   func_set_params KEY VALUE                -> "KEY=VALUE", or " " when KEY or VALUE is null/empty
#   status_check STATUS CMD LOG MODEL [RUN_LOG] -> one "Run successfully/failed with command - ..." line
# Used only by this repository's drivers (prepare.sh needs none of them):
#   func_read_params FILE N                  -> global array `lines` (first N lines, blank lines dropped)
#   func_check_params_spec FILE              -> exit 2 when the standard driver would misread FILE
#   func_ext_value FILE KEY                  -> value of "KEY:value" in an extension file (keyed)
#   status_skip REASON CMD LOG MODEL [RUN_LOG] -> one "Run skipped (REASON) with command - ..." line
#   tipc_has_gpu, tipc_has_tensorrt, tipc_summary

# The TIPC modes ("mode=value" lists name them).
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
# dropped by the split, as in the standard driver; no pathname expansion); exits 2 when fewer
# than $2 are there. $2 = 0 reads the whole file.
function func_read_params() {
    local file=$1 count=$2 dataline
    if [ "${count}" -gt 0 ]; then
        dataline=$(awk -v n="${count}" 'NR<=n{print}' "${file}")
    else
        dataline=$(cat "${file}")
    fi
    set -f
    IFS=$'\n'
    lines=(${dataline})
    unset IFS
    set +f
    if [ "${count}" -gt 0 ] && [ ${#lines[@]} -lt "${count}" ]; then
        echo "error: ${file} has ${#lines[@]} non-blank lines among its first ${count}; ${count} are read (no blank lines)" >&2
        exit 2
    fi
}

function func_is_mode_list() {
    # True when a value is a per-mode list: its first '|' item starts with "<known mode>=".
    local first=${1%%|*}
    local name=${first%%=*}
    [ "${name}" != "${first}" ] || return 1
    local m
    for m in ${TIPC_MODES}; do
        [ "${name}" = "${m}" ] && return 0
    done
    return 1
}

# Exits 2 when the train_infer_python params file $1 (already read into `lines`) uses what the
# standard driver cannot read: a per-mode "mode=value|..." list anywhere but the epoch (idx 6) and
# batch size (idx 8) lines, or a gpu_list (idx 3) entry the standard launcher does not accept.
# tests/test_tipc_params.py checks the committed files against the full rule set.
function func_check_params_spec() {
    local file=$1 idx value bad=0
    for idx in "${!lines[@]}"; do
        [ "${idx}" = "6" ] || [ "${idx}" = "8" ] && continue
        value=$(func_parser_value "${lines[${idx}]}")
        if func_is_mode_list "${value}"; then
            echo "error: ${file} line $((idx + 1)) ('${lines[${idx}]%%:*}') is a per-mode list; the standard TIPC driver reads it as one plain value (per-mode lists are allowed only on lines 7 and 9)" >&2
            bad=1
        fi
    done
    local IFS="|"
    local entry
    for entry in $(func_parser_value "${lines[3]}"); do
        if ! [[ "${entry}" =~ ^(-1|[0-9]+(,[0-9]+)*|[0-9.]+(,[0-9.]+)+\;[0-9]+(,[0-9]+)*)$ ]]; then
            echo "error: ${file} line 4: gpu_list entry '${entry}' is not a device list the standard launcher accepts (-1, 0, 0,1 or ip1,ip2;0,1); CPU data-parallel runs belong in the extension file (cpu_data_parallel)" >&2
            bad=1
        fi
    done
    [ "${bad}" = "0" ] || exit 2
}

# Value of the first "KEY:value" line of extension file $1 (everything after the first ':'),
# or nothing when the file or the key is missing.
function func_ext_value() {
    local file=$1 key=$2
    [ -f "${file}" ] || return 0
    awk -v k="${key}:" 'index($0, k) == 1 { print substr($0, length(k) + 1); exit }' "${file}"
}
