#!/bin/bash
# KDAD TIPC paddle2onnx chain: Paddle inference model -> ONNX (paddle2onnx CLI) -> onnxruntime,
# then the ONNX scores are compared with Paddle Inference on the same images.
#
#   bash test_tipc/prepare.sh test_tipc/configs/KDAD/model_linux_gpu_normal_normal_paddle2onnx_python_linux_cpu.txt paddle2onnx_infer
#   bash test_tipc/test_paddle2onnx.sh test_tipc/configs/KDAD/model_linux_gpu_normal_normal_paddle2onnx_python_linux_cpu.txt
#
# Writes test_tipc/output/<model_name>/paddle2onnx_infer/results_paddle2onnx.log and exits 1 when any
# step failed. See test_tipc/docs/test_paddle2onnx.md. Run from the repository root.

source test_tipc/common_func.sh

FILENAME=$1
MODE=${2:-paddle2onnx_infer}
if [ -z "${FILENAME}" ] || [ ! -f "${FILENAME}" ]; then
    echo "usage: bash test_tipc/test_paddle2onnx.sh PARAMS_FILE [paddle2onnx_infer]" >&2
    exit 2
fi

func_read_params "${FILENAME}" 19

model_name=$(func_parser_value "${lines[1]}")
python=$(func_parser_value "${lines[2]}")
paddle2onnx_cmd=$(func_parser_value "${lines[3]}" | sed "s/^ *//")
infer_model_dir_key=$(func_parser_key "${lines[4]}")
infer_model_dir_value=$(func_parser_value "${lines[4]}")
model_filename_key=$(func_parser_key "${lines[5]}")
model_filename_value=$(func_parser_value "${lines[5]}")
params_filename_key=$(func_parser_key "${lines[6]}")
params_filename_value=$(func_parser_value "${lines[6]}")
save_file_key=$(func_parser_key "${lines[7]}")
save_file_value=$(func_parser_value "${lines[7]}")
opset_version_key=$(func_parser_key "${lines[8]}")
opset_version_value=$(func_parser_value "${lines[8]}")
enable_onnx_checker_key=$(func_parser_key "${lines[9]}")
enable_onnx_checker_value=$(func_parser_value "${lines[9]}")
p2o_param1_key=$(func_parser_key "${lines[10]}")
p2o_param1_value=$(func_parser_value "${lines[10]}")
# onnxruntime inference
inference_py=$(func_parser_value "${lines[11]}")
onnx_file_key=$(func_parser_key "${lines[12]}")
image_dir_key=$(func_parser_key "${lines[13]}")
image_dir_value=$(func_parser_value "${lines[13]}")
batch_size_key=$(func_parser_key "${lines[14]}")
batch_size_list=$(func_parser_value "${lines[14]}")
cpu_threads_key=$(func_parser_key "${lines[15]}")
cpu_threads_value=$(func_parser_value "${lines[15]}")
benchmark_key=$(func_parser_key "${lines[16]}")
benchmark_value=$(func_parser_value "${lines[16]}")
save_dir_key=$(func_parser_key "${lines[17]}")
compare_py=$(func_parser_value "${lines[18]}")

LOG_PATH="./test_tipc/output/${model_name}/${MODE}"
mkdir -p "${LOG_PATH}"
status_log="${LOG_PATH}/results_paddle2onnx.log"
rm -f "${status_log}"
touch "${status_log}"

function show_log() {
    if [ "$1" -ne 0 ]; then
        echo "----- ${2} (failed) -----"
        tail -n 60 "$2"
    else
        tail -n 4 "$2"
    fi
}

# 1. paddle2onnx (a subprocess: it aborts the whole process on unsupported ops)
mkdir -p "$(dirname "${save_file_value}")"
rm -f "${save_file_value}"
set_dirname=$(func_set_params "${infer_model_dir_key}" "${infer_model_dir_value}")
set_model_filename=$(func_set_params "${model_filename_key}" "${model_filename_value}")
set_params_filename=$(func_set_params "${params_filename_key}" "${params_filename_value}")
set_save_model=$(func_set_params "${save_file_key}" "${save_file_value}")
set_opset_version=$(func_set_params "${opset_version_key}" "${opset_version_value}")
set_enable_onnx_checker=$(func_set_params "${enable_onnx_checker_key}" "${enable_onnx_checker_value}")
set_p2o_param1=$(func_set_params "${p2o_param1_key}" "${p2o_param1_value}")
trans_log_path="${LOG_PATH}/trans_model.log"
trans_model_cmd="${paddle2onnx_cmd} ${set_dirname} ${set_model_filename} ${set_params_filename} ${set_save_model} ${set_opset_version} ${set_enable_onnx_checker} ${set_p2o_param1} > ${trans_log_path} 2>&1 "
trans_model_cmd=$(echo "${trans_model_cmd}" | tr -s ' ')
eval "${trans_model_cmd}"
last_status=$?
if [ ${last_status} -eq 0 ] && [ ! -s "${save_file_value}" ]; then
    echo "paddle2onnx exited 0 but wrote no ${save_file_value}" >> "${trans_log_path}"
    last_status=1
fi
show_log ${last_status} "${trans_log_path}"
status_check ${last_status} "${trans_model_cmd}" "${status_log}" "${model_name}" "${trans_log_path}"

# 2. onnxruntime inference, one run per batch size
set_onnx_file=$(func_set_params "${onnx_file_key}" "${save_file_value}")
set_img_dir=$(func_set_params "${image_dir_key}" "${image_dir_value}")
set_cpu_threads=$(func_set_params "${cpu_threads_key}" "${cpu_threads_value}")
set_benchmark=$(func_set_params "${benchmark_key}" "${benchmark_value}")
IFS='|'
batch_sizes=(${batch_size_list})
unset IFS
onnx_results=""
for batch_size in "${batch_sizes[@]}"; do
    _save_log_path="${LOG_PATH}/paddle2onnx_infer_cpu_batchsize_${batch_size}.log"
    result_dir="${LOG_PATH}/onnx_results_batchsize_${batch_size}"
    rm -rf "${result_dir}"
    set_batchsize=$(func_set_params "${batch_size_key}" "${batch_size}")
    set_save_dir=$(func_set_params "${save_dir_key}" "${result_dir}")
    infer_model_cmd="${python} ${inference_py} ${set_onnx_file} ${set_img_dir} ${set_batchsize} ${set_cpu_threads} ${set_benchmark} ${set_save_dir} > ${_save_log_path} 2>&1 "
    infer_model_cmd=$(echo "${infer_model_cmd}" | tr -s ' ')
    eval "${infer_model_cmd}"
    last_status=$?
    show_log ${last_status} "${_save_log_path}"
    status_check ${last_status} "${infer_model_cmd}" "${status_log}" "${model_name}" "${_save_log_path}"
    [ ${last_status} -eq 0 ] && onnx_results="${onnx_results} ${result_dir}/results.json"
done

# 3. Paddle Inference on the same model and images, and the score comparison (project extension)
if [ "${compare_py}" != "null" ] && [ -n "${compare_py}" ]; then
    _save_log_path="${LOG_PATH}/paddle_infer_cpu.log"
    paddle_dir="${LOG_PATH}/paddle_results"
    rm -rf "${paddle_dir}"
    set_model_dir=$(func_set_params "${infer_model_dir_key}" "${infer_model_dir_value}")
    set_save_dir=$(func_set_params "${save_dir_key}" "${paddle_dir}")
    ref_cmd="${python} ${compare_py} ${set_model_dir} ${set_img_dir} ${set_save_dir} > ${_save_log_path} 2>&1 "
    ref_cmd=$(echo "${ref_cmd}" | tr -s ' ')
    eval "${ref_cmd}"
    last_status=$?
    show_log ${last_status} "${_save_log_path}"
    status_check ${last_status} "${ref_cmd}" "${status_log}" "${model_name}" "${_save_log_path}"

    _save_log_path="${LOG_PATH}/compare_onnx_paddle.log"
    compare_cmd="${python} -c \"import json, sys, numpy as np
ref = {r['image']: r['score'] for r in json.load(open(sys.argv[1]))['results']}
assert ref, 'no Paddle Inference results'
for path in sys.argv[2:]:
    got = {r['image']: r['score'] for r in json.load(open(path))['results']}
    assert sorted(got) == sorted(ref), path + ': not the same images'
    a = np.array([ref[k] for k in sorted(ref)]); b = np.array([got[k] for k in sorted(ref)])
    diff = float(np.abs(a - b).max())
    print(path, len(a), 'images, max |onnx - paddle| =', diff)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
print('ONNX scores match Paddle Inference (rtol 1e-4, atol 1e-5)')
\" ${paddle_dir}/results.json${onnx_results} > ${_save_log_path} 2>&1 "
    if [ -z "${onnx_results}" ]; then
        echo "no successful onnxruntime run to compare" > "${_save_log_path}"
        last_status=1
    else
        eval "${compare_cmd}"
        last_status=$?
    fi
    show_log ${last_status} "${_save_log_path}"
    status_check ${last_status} "python -c <compare results.json scores: onnxruntime vs Paddle Inference> ${paddle_dir}/results.json${onnx_results}" "${status_log}" "${model_name}" "${_save_log_path}"
fi

tipc_summary "${status_log}"
exit $?
